"""A GPT-style autoregressive transformer with a KV cache: the AR baseline and the judge."""

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F

from flowlm._checks import check_tokens
from flowlm._types import Logits, TokenLoss, Tokens
from flowlm.backbones.layers import MLP, Attention, KVCache


class _CausalBlock(nn.Module):
    """Pre-LayerNorm block: causal attention, then MLP, each added to the residual stream."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, causal=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, h: Float[Tensor, "batch seq dim"], cache: KVCache | None
    ) -> Float[Tensor, "batch seq dim"]:
        h = h + self.dropout(self.attention(self.attention_norm(h), cache))
        return h + self.dropout(self.mlp(self.mlp_norm(h)))


class CausalTransformer(nn.Module):
    r"""Autoregressive transformer: $p(x) = \prod_i p(x_i \mid \mathrm{BOS}, x_{<i})$.

    Pre-LayerNorm blocks with rotary positions, causal attention with logits soft-capped at
    50 and a tanh-GELU MLP of width $4d$; untied input and output embeddings. The input
    embedding has one extra row, index ``vocab_size``, for the internal beginning-of-sequence
    token; the outputs cover the ``vocab_size`` real tokens only.

    Args:
        vocab_size: $V$, the number of real tokens.
        dim: model width.
        depth: number of blocks.
        heads: attention heads; ``dim / heads`` must be even.
        max_len: the longest sequence accepted.
        dropout: dropout on the attention and MLP outputs (call ``eval()`` before scoring or
            generating).

    Examples:
        >>> model = CausalTransformer(5, dim=16, depth=1, heads=2).eval()
        >>> tokens = model.generate(2, 4, generator=torch.Generator().manual_seed(0))
        >>> tokens.shape, model.token_nll(tokens).shape
        (torch.Size([2, 4]), torch.Size([2, 4]))
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 8,
        heads: int = 8,
        max_len: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.bos = vocab_size
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size + 1, dim)
        self.blocks = nn.ModuleList(_CausalBlock(dim, heads, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: Tokens) -> Logits:
        """Next-token logits: position ``i`` predicts ``tokens[:, i]`` from BOS + ``tokens[:, :i]``.

        Examples:
            >>> model = CausalTransformer(5, dim=16, depth=1, heads=2)
            >>> model(torch.tensor([[0, 4, 2]])).shape
            torch.Size([1, 3, 5])
        """
        check_tokens(tokens, self.vocab_size)
        bos = torch.full_like(tokens[:, :1], self.bos)
        return self.next_token_logits(torch.cat([bos, tokens[:, :-1]], dim=1))

    def next_token_logits(
        self, inputs: Int[Tensor, "batch seq"], caches: list[KVCache] | None = None
    ) -> Logits:
        """Logits of the token after each input id (ids in ``[0, vocab_size]``, the last is BOS).

        Without ``caches`` the inputs start at position 0. With one `KVCache` per block they
        continue the positions the caches already hold, and the caches grow by the inputs.

        Examples:
            >>> model = CausalTransformer(5, dim=16, depth=2, heads=2)
            >>> caches = [KVCache() for _ in model.blocks]
            >>> model.next_token_logits(torch.tensor([[5], [5]]), caches).shape
            torch.Size([2, 1, 5])
        """
        check_tokens(inputs, self.vocab_size + 1)
        self._check_length((0 if caches is None else caches[0].length) + inputs.shape[1])
        h = self.embedding(inputs)
        for index, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[index])
        return self.output(self.output_norm(h))

    def token_nll(self, tokens: Tokens) -> TokenLoss:
        r"""Per-token negative log-likelihood $-\log p(x_i \mid x_{<i})$, in at least fp32.

        Examples:
            >>> model = CausalTransformer(5, dim=16, depth=1, heads=2)
            >>> model.token_nll(torch.tensor([[0, 4, 2]])).shape
            torch.Size([1, 3])
        """
        logits = self(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(rearrange(logits, "b l v -> b v l"), tokens, reduction="none")

    def generate(
        self,
        batch_size: int,
        length: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tokens:
        r"""Sample sequences token by token from $p(x_i \mid x_{<i})^{1/T}$, without gradients.

        With ``use_cache`` each step feeds only the newest token and reuses the keys and values
        of the prefix; without it each step recomputes the whole prefix (same result, slower).

        Args:
            batch_size: number of sequences.
            length: tokens per sequence.
            temperature: $T > 0$, dividing the logits.
            generator: random generator on the model's device, for reproducible samples.
            use_cache: reuse keys and values across steps.

        Examples:
            >>> model = CausalTransformer(5, dim=16, depth=1, heads=2).eval()
            >>> model.generate(3, 2, temperature=0.5).shape
            torch.Size([3, 2])
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self._check_length(length)
        device = self.output.weight.device
        inputs = torch.full((batch_size, 1), self.bos, device=device)
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        with torch.no_grad():
            for _ in range(length):
                if caches is None:
                    logits = self.next_token_logits(inputs)[:, -1]
                else:
                    logits = self.next_token_logits(inputs[:, -1:], caches)[:, -1]
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator)
                inputs = torch.cat([inputs, next_tokens], dim=1)
        return inputs[:, 1:]

    def _check_length(self, positions: int) -> None:
        if positions > self.max_len:
            raise ValueError(f"sequence of {positions} positions exceeds max_len={self.max_len}")
