"""``python -m mcit`` (what ``accelerate launch -m mcit`` and ``mcit run --num-processes`` start)."""

from mcit.cli import main

if __name__ == "__main__":
    main()
