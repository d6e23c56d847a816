"""Running on a Ray cluster: job submission (Ray Jobs API) and where runs keep their files."""
