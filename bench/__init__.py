"""otbench: a benchmark harness for optimal-transport guided image translation."""
__version__ = "0.1.0"
