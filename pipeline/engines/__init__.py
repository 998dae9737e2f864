"""What runs the stages: a job planned, run on one process, several devices or a Ray cluster,
killed, resumed and committed. Engines may import everything else in pipeline/."""
