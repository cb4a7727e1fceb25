"""The CPU decode kernels: `ops` (where they run, the switch back to torch), `csrc/` (AVX-512 and AVX2 C++)."""
