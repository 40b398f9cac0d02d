"""`python -m flaxtrain`: the same as the `flaxtrain` command."""

from flaxtrain.main import run

if __name__ == "__main__":
  run()
