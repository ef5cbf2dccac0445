set(ORCHARD_CPU_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/cpu_backend.cpp
  ${CMAKE_CURRENT_LIST_DIR}/forward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/fp16_rows.cpp
  ${CMAKE_CURRENT_LIST_DIR}/decode.cpp
  ${CMAKE_CURRENT_LIST_DIR}/backward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/dropout_mask.cpp
  ${CMAKE_CURRENT_LIST_DIR}/few_rows_forward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/gemm.cpp
  ${CMAKE_CURRENT_LIST_DIR}/gemm_bf16.cpp
  ${CMAKE_CURRENT_LIST_DIR}/score_mods.cpp
  ${CMAKE_CURRENT_LIST_DIR}/softmax_tile.cpp
  ${CMAKE_CURRENT_LIST_DIR}/split_bf16x3.cpp
  ${CMAKE_CURRENT_LIST_DIR}/stage_bf16_panels.cpp
  ${CMAKE_CURRENT_LIST_DIR}/stage_f32_tiles.cpp
  ${CMAKE_CURRENT_LIST_DIR}/store_row_bf16.cpp
  ${CMAKE_CURRENT_LIST_DIR}/strided_copy.cpp
  ${CMAKE_CURRENT_LIST_DIR}/task_pool.cpp
)
# The tile kernels rely on FMA contraction of a*b+c in the vector code (the
# default with GNU extensions, made explicit so -std=c++20 cannot turn it off).
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set_source_files_properties(${ORCHARD_CPU_SOURCES} PROPERTIES COMPILE_OPTIONS "-ffp-contract=fast")
endif()
