"""The phases of `runner.run()`, in the order it calls them: prepare.py (1-4), train.py (5-8)."""
