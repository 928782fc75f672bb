"""apex.optimizers.FusedAdam / FusedSGD in plain torch, keeping apex's state layout.

What Megatron (and the checkpoints it writes) depend on:
* FusedAdam keeps ONE step counter per param group, `group['step']` (an int, created by the first
  step), so it lands in `optimizer.state_dict()['param_groups']`; per-parameter state holds only
  'exp_avg' and 'exp_avg_sq' (Megatron's init_state_fn and DistributedOptimizer.load_state_dict
  create exactly these two).
* The update is apex's multi_tensor_adam in fp32: adam_w_mode (decoupled weight decay) by default,
  bias correction 1 - beta**step.
* FusedSGD keeps 'momentum_buffer' per parameter, like torch.optim.SGD.
"""

import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode
        self.set_grad_none = set_grad_none

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group['step'] = group['step'] + 1 if 'step' in group else 1
            beta1, beta2 = group['betas']
            step = group['step']
            bc1 = 1.0 - beta1 ** step if group['bias_correction'] else 1.0
            bc2 = 1.0 - beta2 ** step if group['bias_correction'] else 1.0
            lr, eps, decay = group['lr'], group['eps'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state['exp_avg'] = torch.zeros_like(p)
                    state['exp_avg_sq'] = torch.zeros_like(p)
                _adam_update(p, p.grad.float(), state['exp_avg'], state['exp_avg_sq'],
                             beta1, beta2, bc1, bc2, lr, eps, decay, self.adam_w_mode)
        return loss


def _adam_update(p, g, m, v, beta1, beta2, bc1, bc2, lr, eps, decay, adam_w_mode):
    """apex multi_tensor_adam's per-element math (ADAM_MODE_0 = L2, ADAM_MODE_1 = AdamW)."""
    pf = p.float()
    if not adam_w_mode:
        g = g + decay * pf
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    update = (m / bc1) / ((v / bc2).sqrt() + eps)
    if adam_w_mode:
        update = update + decay * pf
    p.copy_(pf - lr * update)


class FusedSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 wd_after_momentum=False, materialize_master_grads=True, set_grad_none=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                d_p = p.grad.float() + group['weight_decay'] * p.float()
                if group['momentum'] != 0:
                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = d_p.clone()
                    else:
                        state['momentum_buffer'].mul_(group['momentum']).add_(d_p, alpha=1 - group['dampening'])
                    buf = state['momentum_buffer']
                    d_p = d_p + group['momentum'] * buf if group['nesterov'] else buf
                p.add_(d_p.to(p.dtype), alpha=-group['lr'])
        return loss
