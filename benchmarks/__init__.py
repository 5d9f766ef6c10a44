"""`make bench`: how fast the kernel is learned, against the original recipe and the
closed-form answer, and what each pipeline stage costs in time, memory and disk."""
