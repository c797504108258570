"""Pure logic: no I/O and no clock reads. Time is always a parameter."""
