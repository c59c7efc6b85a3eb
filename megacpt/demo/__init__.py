"""`megacpt demo`: continual pretraining from prose to code on corpora every CPython carries."""
