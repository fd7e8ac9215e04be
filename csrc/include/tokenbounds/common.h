// Macros shared by every header in tokenbounds/: functions usable from host C++ and CUDA device code.
#pragma once

#if defined(__CUDACC__)
#define TB_HD __host__ __device__ __forceinline__
#else
#define TB_HD inline
#endif
