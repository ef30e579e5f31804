"""The CPU's feature flags, for tests that run one instruction-set path each and skip the ones it lacks."""


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split())
