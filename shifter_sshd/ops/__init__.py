"""For admins: doctor (is this node ready?) with its Slurm checks, and status."""
