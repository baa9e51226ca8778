"""A run's workdir: its recorded files and manifest, the lease, goodput records, markers."""
