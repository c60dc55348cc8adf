"""The synthetic conveyor: a procedural RGB-D world for development, tests, benchmarks and demos."""
