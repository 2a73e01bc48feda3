"""One thin module per smart-host program, named after it."""
