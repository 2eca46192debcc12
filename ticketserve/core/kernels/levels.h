// The kernels' dispatch levels, chosen at run time: 2 = AVX-512F+FMA, 1 = AVX2+FMA, 0 = portable C++.
#pragma once

inline int best_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}
