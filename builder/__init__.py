"""moebuild: declarative Mixture-of-Experts vision-language models."""
