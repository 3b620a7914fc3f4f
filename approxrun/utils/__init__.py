"""Small helpers shared across approxrun."""
