"""ONNX export and the torch-free numpy + onnxruntime sampler (installed as fastddpm.export).

    onnx_export.py      export_onnx / export_checkpoint (`fastddpm export`): one .onnx file holding
                        the eps-model (or the whole step) and, in its metadata, the U-Net config,
                        the float64 betas and the diffusion settings
    group_norm_onnx.py  how GroupNorm(+SiLU) is written into the graph (InstanceNormalization form,
                        or GroupNormalization-21), and the opset traps that decided it
    step_graph.py       the traced modules: the eps-model alone, or eps-model + reverse-step update
    ort_sample.py       the sampler: numpy + onnxruntime only, one file to copy to an inference host
    ort_backend.py      `backend="onnx"` / `fastddpm sample --backend onnx --onnx FILE.onnx`, which runs
                        ort_sample.py's loop

Importing this package imports nothing heavy; ort_sample.py imports only numpy (and onnxruntime
when a model is opened).
"""
