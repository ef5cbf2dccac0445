# How the CUDA backend's files compile for ORCHARD_CUDA_ARCHS (CMAKE_CUDA_ARCHITECTURES syntax:
# "80;90", "80-real;90", "90-virtual", ...).
#
# CMake's own handling runs nvcc's front end (cicc) once per architecture, and cicc is about half
# of an sm80 kernel file's compile time (nvcc --time: bwd d96 28 s cicc + 29 s ptxas per
# architecture). Most of the backend's device code is the same on every architecture, so those
# files (ONE_PASS) compile to one PTX, at the lowest architecture listed, from which ptxas makes
# each architecture's SASS: a fifth to a quarter less CPU time per file, and the same sm_90 SASS
# as a front-end pass per architecture (cuobjdump, bench/NOTES.md). Files whose code depends on
# __CUDA_ARCH__ (sm_90's float4 dQ reductions, programmatic dependent launch) are PER_ARCH: one
# front-end pass per architecture, as CMake does. A list this does not parse (native, all, 90a,
# ...) leaves every file to CMake's handling.
#
#   orchard_cuda_sources(<target> "<archs>" [ONE_PASS <files>...] [PER_ARCH <files>...])
function(orchard_cuda_sources target archs)
  cmake_parse_arguments(ARG "" "" "ONE_PASS;PER_ARCH" ${ARGN})
  target_sources(${target} PRIVATE ${ARG_ONE_PASS} ${ARG_PER_ARCH})
  # CMake 3.25 does not know nvcc 13's C++20 flag: with CXX_STANDARD 20 REQUIRED (inherited by
  # CUDA_STANDARD) it refuses to generate, so -std=c++20 goes on each file (nvcc accepts the
  # duplicate identical flag newer CMakes add).
  set_target_properties(${target} PROPERTIES CUDA_STANDARD_REQUIRED OFF)
  set(per_arch "")
  set(one_pass_sass "")
  set(lowest "")
  set(want_ptx OFF)
  foreach(arch IN LISTS archs)
    if(NOT arch MATCHES "^([0-9]+)(-real|-virtual)?$")
      set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${archs}")
      set_source_files_properties(${ARG_ONE_PASS} ${ARG_PER_ARCH} PROPERTIES COMPILE_OPTIONS "-std=c++20")
      return()
    endif()
    set(n ${CMAKE_MATCH_1})
    if(NOT CMAKE_MATCH_2 STREQUAL "-virtual")
      list(APPEND per_arch "-gencode=arch=compute_${n},code=sm_${n}")
      list(APPEND one_pass_sass ${n})
    endif()
    if(NOT CMAKE_MATCH_2 STREQUAL "-real")
      list(APPEND per_arch "-gencode=arch=compute_${n},code=compute_${n}")
      set(want_ptx ON)
    endif()
    if(lowest STREQUAL "" OR n LESS lowest)
      set(lowest ${n})
    endif()
  endforeach()
  set(one_pass "")
  foreach(n IN LISTS one_pass_sass)
    list(APPEND one_pass "-gencode=arch=compute_${lowest},code=sm_${n}")
  endforeach()
  if(want_ptx)
    list(APPEND one_pass "-gencode=arch=compute_${lowest},code=compute_${lowest}")
  endif()
  # The flags are per file, so the target adds none of its own.
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF)
  if(ARG_ONE_PASS)
    set_source_files_properties(${ARG_ONE_PASS} PROPERTIES COMPILE_OPTIONS "-std=c++20;${one_pass}")
  endif()
  if(ARG_PER_ARCH)
    set_source_files_properties(${ARG_PER_ARCH} PROPERTIES COMPILE_OPTIONS "-std=c++20;${per_arch}")
  endif()
endfunction()
