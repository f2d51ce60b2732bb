"""Local runs: the in-process engine, Flower's Ray runtime, the fedpriv command."""
