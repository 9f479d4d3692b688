"""The shard's edge of the wire: ShardService messages to and from the runner's plain types."""

from mixserve.shards.memory import MemoryReport
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceResult, SequenceStep
from mixserve_pb import shard_pb2


def memory_proto(m: MemoryReport) -> shard_pb2.MemoryReport:
    """The warm-up's memory report as its message."""
    return shard_pb2.MemoryReport(
        weight_bytes=m.weight_bytes,
        kv_cache_bytes=m.kv_cache_bytes,
        block_bytes=m.block_bytes,
        peak_activation_bytes=m.peak_activation_bytes,
        headroom_bytes=m.headroom_bytes,
        free_bytes=m.free_bytes,
        max_batch_tokens=m.limits.max_batch_tokens,
        max_batch_size=m.limits.max_batch_size,
        max_context_tokens=m.limits.max_context,
    )


def step_response(results: list[SequenceResult], forward_ns: int, steps: int = 0) -> shard_pb2.StepResponse:
    """A step's results as a StepResponse, the step having taken `forward_ns`; `steps` the decode steps run."""
    return shard_pb2.StepResponse(
        results=[
            shard_pb2.SequenceResult(
                seq_id=r.seq_id,
                sampled=r.sampled,
                token_id=r.token_id,
                logprob=r.logprob,
                top_tokens=[shard_pb2.TopToken(token_id=t, logprob=lp) for t, lp in r.top_tokens],
                prompt_logprobs=r.prompt_logprobs,
                prompt_top_tokens=[
                    shard_pb2.PromptTop(top_tokens=[shard_pb2.TopToken(token_id=t, logprob=lp) for t, lp in top])
                    for top in r.prompt_top_tokens
                ],
                prompt_ranks=r.prompt_ranks,
                next_tokens=[
                    shard_pb2.NextToken(
                        token_id=n.token_id,
                        logprob=n.logprob,
                        top_tokens=[shard_pb2.TopToken(token_id=t, logprob=lp) for t, lp in n.top_tokens],
                    )
                    for n in r.next_tokens
                ],
                num_drafted=r.num_drafted,
            )
            for r in results
        ],
        forward_us=forward_ns // 1000,
        steps=steps,
    )


def run_response(steps: list[tuple[list[SequenceResult], int]], steps_before: int) -> shard_pb2.StepResponse:
    """One DecodeSteps answer for consecutive steps of a run, each (results, forward_ns), after `steps_before`
    steps already sent: the first step's answer, the others in its `following`."""
    answers = [step_response(results, ns, steps_before + i) for i, (results, ns) in enumerate(steps, start=1)]
    answers[0].following.extend(answers[1:])
    return answers[0]


def step_from_proto(msg: shard_pb2.SequenceStep) -> SequenceStep:
    """A SequenceStep message as the runner's step."""
    return SequenceStep(
        seq_id=msg.seq_id,
        token_ids=list(msg.token_ids),
        start_position=msg.start_position,
        slot_mapping=list(msg.slot_mapping),
        block_table=list(msg.block_table),
        sample=msg.sample,
        sampling=SamplingParams.from_proto(msg.sampling) if msg.HasField("sampling") else None,
        prefix_token_ids=list(msg.prefix_token_ids),
        prompt_logprobs=msg.prompt_logprobs,
        num_proposed=msg.num_proposed,
        draft=msg.draft,
        speculate=msg.speculate,
        run_tokens=msg.run_tokens,
    )
