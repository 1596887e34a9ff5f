"""HTML templates for the evaluation, comparison and geometry reports (package data)."""
