"""Small helpers shared by tests (not part of the library)."""
from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.sampling import SamplingParams


def greedy_ids(engine, prompt_ids, n):
    """n greedy tokens after a prompt (EOS does not stop)."""
    req = GenerationRequest(max_new_tokens=n, sampling=SamplingParams(temperature=0.0),
                            stop_at_eos=False)
    return list(generate_tokens(engine, prompt_ids, req))
