//! Timings of the kernels against the composite references (ignored tests).
