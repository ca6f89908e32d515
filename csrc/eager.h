// The C++ functions behind metamixer_fast._C's Python entry points (csrc/binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace metamixer {

// metamixer_fast.mixed_kd_loss in eager mode on CPU tensors (csrc/mixed_kd_loss.cpp): the
// forward, and, when a gradient is needed, one autograd node for the backward.
std::tuple<at::Tensor, at::Tensor> mixed_kd_loss_eager(
    at::TensorList logits, const at::Tensor& labels, const std::optional<at::Tensor>& weights,
    double temperature, double label_smoothing, std::string_view mode,
    const std::optional<at::Tensor>& peer_matrix, bool detach_targets);

// metamixer_fast.mix / mix2 in eager mode on CPU tensors, no gradient needed (csrc/mix.cpp):
// the metamixer_cpp kernels with every argument checked, called without the dispatcher.
at::Tensor mix_eager(const at::Tensor& x, const at::Tensor& src, const at::Tensor& w,
                     const std::optional<at::Tensor>& box);
at::Tensor mix2_eager(const at::Tensor& x, const at::Tensor& src, const at::Tensor& w,
                      const std::optional<at::Tensor>& box, const at::Tensor& src2,
                      const at::Tensor& w2);

}  // namespace metamixer
