// Portability macros shared by host and device code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ORCHARD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ORCHARD_HOST_DEVICE inline
#endif
