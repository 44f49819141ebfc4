"""`make bench`: placeholder until the detector-zoo issue lands the timing scripts."""

if __name__ == "__main__":
    print("benchmarks: not yet implemented")
