"""``python -m vlaug`` runs the CLI (this is also what ``torchrun -m vlaug`` starts)."""

from vlaug.cli import main

if __name__ == "__main__":
    main()
