//! Energy measurement (RAPL, NVML, CPU-time estimate) and CO2.
