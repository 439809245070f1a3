"""Layer skipping: static removal of decoder layers by measured importance."""
