"""Protocol servers for systems that cannot run here, built from their vendors' documentation."""
