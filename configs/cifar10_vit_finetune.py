"""Fine-tune an ImageNet-21k ViT-B/32 (timm/AugReg weights) on CIFAR-10.

    # The weights (a safetensors file, no code): from the Hugging Face hub.
    huggingface-cli download timm/vit_base_patch32_224.augreg_in21k_ft_in1k \
        model.safetensors --local-dir downloads/vit_b32_augreg
    flaxtrain --config=configs/cifar10_vit_finetune.py --workdir=runs/cifar10_vit_finetune
    # Another file: --config.init_from=path/to/model.safetensors (or a .pth, read with
    # torch's weights_only loader); a linear probe: --config.optimizer.freeze=backbone.

Recipe (big_vision configs/transfer.py, the BiT/ViT transfer protocol): the classic
ViT-B/32 of timm (class token, learned position embedding; 87,462,922 parameters with
10 classes) initialised from the file, its 1,000-class head replaced by a fresh
10-class one (zero-initialised; one log line says so); CIFAR-10 upsampled to 224 px on
the host and flipped; pixels scaled to [-1, 1] as AugReg's weights expect; SGD with
momentum 0.9, peak lr 0.003, 500 warmup steps then cosine to 0 over 10,000 steps of
batch 512 (~102 epochs), global-norm clipping 1.0, no weight decay, bfloat16 compute.

Expected: big_vision's transfer.py reports 98.55% (5-run mean, 98.46-98.60%) for
AugReg ViT-B/32 (i21k) on CIFAR-10 with this protocol (its input: resize to 384,
crop). flaxtrain's import of timm ViT weights is checked against timm's own logits
(tests/test_pretrained.py); this recipe is not measured by flaxtrain's authors (no
accelerator, no download where it is developed).
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.get_base_config()
  c.dataset.name = "cifar10"
  c.dataset.source = "stream"  # Resized to 224 on the host.
  c.dataset.image_size = 224
  c.dataset.mean = (127.5, 127.5, 127.5)
  c.dataset.std = (127.5, 127.5, 127.5)
  c.augment.flip = True
  c.model = config_lib.vit_model(variant="B/32", pool="token", posemb="learn")
  c.init_from = "downloads/vit_b32_augreg/model.safetensors"
  c.compute_dtype = "bfloat16"
  c.batch_size = 512
  c.eval_batch_size = 1000
  c.num_train_steps = 10_000
  c.optimizer.grad_clip_norm = 1.0
  steps_per_epoch = 50_000 / 512
  c = config_lib.sgd_warmup_cosine(
    c, learning_rate=0.003, weight_decay=0.0, warmup_epochs=500 / steps_per_epoch
  )
  c.optimizer.nesterov = False
  return c
