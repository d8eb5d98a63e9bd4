"""Pure math: FFT long convolutions, implicit filters, short depthwise convs, packed-sequence
boundaries. No process groups."""
from hyena_cp.ops.fftconv import fft_causal_conv1d, fft_conv2d
from hyena_cp.ops.filters import ImplicitFilter1d, ImplicitFilter2d
from hyena_cp.ops.packing import check_cu_seqlens, document_ids, document_positions
from hyena_cp.ops.short_conv import causal_depthwise_conv1d, depthwise_conv2d_same

__all__ = ["fft_causal_conv1d", "fft_conv2d", "ImplicitFilter1d", "ImplicitFilter2d",
           "causal_depthwise_conv1d", "depthwise_conv2d_same", "check_cu_seqlens", "document_ids",
           "document_positions"]
