"""The ExecuTorch target: gpt-oss as `.pte` + `.ptd`, experts through the `ossedge::` MoE ops."""
