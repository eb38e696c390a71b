"""Fault injection around the real apps, for the federation tests (run in a subprocess by those tests)."""

import json
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp


def build_faulty_client_app(defaults: dict, fault: str, partition: int, record_dir: Path) -> ClientApp:
    """Wrap the real ClientApp: the site at ``partition`` sends NaN weights (``nan``) or fails (``crash``).

    Every reply's records are also written to ``record_dir`` as text, so a test can look for real expert ids
    in what left the sites.
    """
    from client.app import build_client_app

    real = build_client_app(defaults)
    app = ClientApp()

    def dump(reply: Message, context: Context, kind: str) -> None:
        partition_id = context.node_config["partition-id"]
        configs = {name: dict(record) for name, record in reply.content.config_records.items()}
        metrics = {name: dict(record) for name, record in reply.content.metric_records.items()}
        arrays = {name: list(record.keys()) for name, record in reply.content.array_records.items()}
        text = json.dumps({"configs": configs, "metrics": metrics, "arrays": arrays}, default=str)
        path = record_dir / f"{kind}-{partition_id}-{reply.metadata.reply_to_message_id[:12]}.json"
        path.write_text(text)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        reply = real(message, context)
        dump(reply, context, "query")
        return reply

    @app.train()
    def train(message: Message, context: Context) -> Message:
        is_faulty = int(context.node_config["partition-id"]) == partition
        if is_faulty and fault == "crash":
            raise RuntimeError("simulated site failure in the middle of a round")
        reply = real(message, context)
        if is_faulty and fault == "nan":
            arrays = reply.content["arrays"]
            name = next(iter(arrays.keys()))
            values = arrays[name].numpy().copy()
            values.flat[0] = np.nan
            arrays[name] = Array(values)
        dump(reply, context, "train")
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        reply = real(message, context)
        dump(reply, context, "evaluate")
        return reply

    return app


def main(federation: str, run_dir: str, fault: str, partition: int, stop_after: int) -> None:
    """Run a simulation with the faulty client; ``stop_after`` > 0 interrupts the server after that round."""
    from flwr.simulation import run_simulation

    from cli.simulate import resolve_federation_file
    from server.app import build_server_app
    from server.strategy import SharedFedAvg

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    record_dir = run / "replies"
    record_dir.mkdir(exist_ok=True)
    federation_file, config = resolve_federation_file(Path(federation), run, None)
    options = {"federation": str(federation_file), "run-dir": str(run)}

    if stop_after > 0:
        original = SharedFedAvg.end_round

        def end_round_then_stop(self, server_round, arrays):
            result = original(self, server_round, arrays)
            if server_round + self.round_offset == stop_after:
                raise KeyboardInterrupt(f"coordinator stopped after round {stop_after}")
            return result

        SharedFedAvg.end_round = end_round_then_stop

    run_simulation(
        server_app=build_server_app(options),
        client_app=build_faulty_client_app(options, fault, partition, record_dir),
        num_supernodes=len(config.sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
