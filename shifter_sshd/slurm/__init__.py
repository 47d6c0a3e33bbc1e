"""What Slurm tells us and how we ask: the job from the prolog's environment, slurmctld
queries, node lists, slurm.conf checks, slurmstepd adoption, the SPANK plugin's build.
"""
