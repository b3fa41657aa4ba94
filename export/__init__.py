"""leo_rt.export: exported engines (ONNX, AOTInductor, TensorRT) of the animator and LMDM stages.

Installed as ``leo_rt.export``; the stage wrappers and exporters arrive with the export work.
"""
