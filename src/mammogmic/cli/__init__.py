"""Command-line interface: the only place that parses argv and sets up logging, tqdm and matplotlib."""
