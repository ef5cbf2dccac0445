# The sm_90a (Hopper) kernels: compiled ONLY for sm_90a (wgmma and setmaxnreg exist on no
# other target), as an object library beside the backend's multi-arch sources, and only when
# ORCHARD_CUDA_ARCHS names 90 (90, 90a, 90-real, ...).  Without it the dispatch never takes
# the sm90 path (ORCHARD_WITH_SM90 undefined) and the build holds no sm_90a code.
#   orchard_add_sm90(<target> "<archs>" <source root>)
set(ORCHARD_CUDA_SM90_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_bf16_d64.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_bf16_d96.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_bf16_d128.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_bf16_d192.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_bf16_d256.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_fp16_d64.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_fp16_d96.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_fp16_d128.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_fp16_d192.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_fwd_sm90_fp16_d256.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_bf16_d64.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_bf16_d96.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_bf16_d128.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_fp16_d64.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_fp16_d96.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_fp16_d128.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_bf16_d192.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_bf16_d256.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_fp16_d192.cu
  ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_fp16_d256.cu
)
# The backward's driver: compiled with the target's own architectures (it instantiates the
# sm80 pre-pass and dQ convert kernels; see the file).
set(ORCHARD_CUDA_SM90_DRIVER_SOURCES ${CMAKE_CURRENT_LIST_DIR}/flash_bwd_sm90_passes.cu)
function(orchard_add_sm90 target archs root)
  set(_sm90 ${archs})
  list(FILTER _sm90 INCLUDE REGEX "^90")
  if(NOT _sm90)
    return()
  endif()
  add_library(${target}_sm90 OBJECT ${ORCHARD_CUDA_SM90_SOURCES})
  set_target_properties(${target}_sm90 PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON
                                                  CUDA_STANDARD_REQUIRED OFF)
  target_include_directories(${target}_sm90 PRIVATE ${root}/include ${root}/src)
  # -std=c++20 per target (see ../arch_flags.cmake: CMake 3.25 does not know nvcc 13's flag).
  target_compile_options(${target}_sm90 PRIVATE -std=c++20 -gencode=arch=compute_90a,code=sm_90a
                                                --expt-relaxed-constexpr -O3 -lineinfo)
  target_sources(${target} PRIVATE $<TARGET_OBJECTS:${target}_sm90>)
  # Its convert kernel's code is the same everywhere but the pre-pass (bwd_dot_kernel) differs
  # slightly by architecture: compiled like the atomic-dQ files (../arch_flags.cmake).
  orchard_cuda_sources(${target} "${archs}" PER_ARCH ${ORCHARD_CUDA_SM90_DRIVER_SOURCES})
  target_compile_definitions(${target} PRIVATE ORCHARD_WITH_SM90=1)
endfunction()
