"""Pure math: FFT long convolutions, boundary conditions, implicit filters, short depthwise convs,
packed-sequence boundaries. No process groups."""
from hyena_cp.ops.boundary import BOUNDARIES, kernel_offsets
from hyena_cp.ops.explicit import ExplicitFilter
from hyena_cp.ops.fftconv import fft_causal_conv1d, fft_conv2d, fft_conv_nd
from hyena_cp.ops.filters import FourierFilter, KernelGrid
from hyena_cp.ops.masks import AxisExponentialMask, ExponentialMask, GaussianMask
from hyena_cp.ops.modal import ModalFilter
from hyena_cp.ops.siren import RandomFourierFilter, SirenFilter
from hyena_cp.ops.packing import check_cu_seqlens, document_ids, document_positions
from hyena_cp.ops.safari import SafariFilter
from hyena_cp.ops.short_conv import causal_depthwise_conv1d, depthwise_conv2d_same, depthwise_conv_nd

__all__ = ["BOUNDARIES", "kernel_offsets", "fft_causal_conv1d", "fft_conv2d", "fft_conv_nd", "ExponentialMask",
           "AxisExponentialMask", "GaussianMask", "RandomFourierFilter", "SirenFilter",
           "FourierFilter", "ExplicitFilter", "ModalFilter", "SafariFilter", "KernelGrid", "causal_depthwise_conv1d", "depthwise_conv2d_same", "depthwise_conv_nd",
           "check_cu_seqlens", "document_ids", "document_positions"]
