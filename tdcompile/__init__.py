"""tdcompile: a torch.compile backend ("tdist") that fuses tensor-parallel communication into GEMMs."""
