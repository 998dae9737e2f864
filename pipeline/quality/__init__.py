"""Answer quality: SQuAD metrics, calibration, the output summary, SQuAD conversion. Quality
tools read outputs and may use stages/ and models/, never engines/."""
