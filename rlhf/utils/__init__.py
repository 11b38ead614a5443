"""Small shared helpers: atomic I/O, seeding, metrics logging, checkpoints, memory."""
