"""`make demo`: ragtune's main job on a kind cluster built on this machine.

Brings up the cluster (Docker, the offline node image), builds and loads ragtune's images, installs the chart, puts
the tiny Llama and all-MiniLM-L6-v2 on volumes, applies the samples in e2e/samples (a FineTuneJob, a VectorIndex
and a hybrid HybridEndpoint served by vLLM on CPU), asks the endpoint a question through the OpenAI client and
prints the answer with its sources. The cluster stays up afterwards (`make kind-down` removes it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e"))

import stack  # noqa: E402

NAMESPACE = "demo"
QUESTION = "How does a GitOps pipeline promote a new adapter without failed requests?"


def main() -> int:
    started = time.monotonic()
    say = stack.say
    say("1/6 cluster (first run builds Kubernetes, kind and the node image from source: tens of minutes)")
    kind = stack.Kind(stack.cluster_up())
    say("2/6 images (first run fills a wheelhouse and builds four images)")
    stack.images()
    say("3/6 chart")
    stack.install_chart(kind, stack.project_version())
    say("4/6 volumes with the local models and examples/docs")
    stack.stage_data()
    if not kind.get("namespace", NAMESPACE):
        kind.kubectl("create", "namespace", NAMESPACE)
    kind.apply(stack.volumes(NAMESPACE))
    say("5/6 samples: FineTuneJob faq-v1, VectorIndex docs, HybridEndpoint faq (kubectl get ragtune -n demo)")
    for name in ("finetunejob.yaml", "vectorindex.yaml", "hybridendpoint.yaml"):
        kind.apply(stack.sample(name, NAMESPACE))
    for kind_name, name in (("finetunejob", "faq-v1"), ("vectorindex", "docs"), ("hybridendpoint", "faq")):
        obj = stack.wait_ready(kind, kind_name, name, NAMESPACE, timeout=1200)
        say(f"  {kind_name}/{name} Ready {summary(kind_name, stack.status(obj))}")
    url = stack.node_port_url(kind, "faq", NAMESPACE)
    say(f"6/6 asking {url}/v1/chat/completions: {QUESTION}")
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    response = client.chat.completions.create(model="faq", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=32)
    print("\nanswer (a tiny model trained in seconds: the words are noise, the pipeline is real):")
    print(f"  {response.choices[0].message.content!r}")
    print("sources:")
    for source in (response.model_extra or {}).get("sources") or []:
        print(f"  - {source.get('document')} § {source.get('section') or '-'} "
              f"(chunk {source.get('chunk')}, score {source.get('score'):.3f})")
    say(f"done in {time.monotonic() - started:.0f}s; the cluster stays up: "
        f"KUBECONFIG={stack.STATE / 'kubeconfig'} kubectl get ragtune -n {NAMESPACE}; make kind-down removes it")
    return 0


def summary(kind_name: str, status: dict) -> str:
    if kind_name == "finetunejob":
        return f"(adapter {status['artifact']['digest'][:19]}…, loss {status['progress'].get('loss')})"
    if kind_name == "vectorindex":
        return f"({status.get('documents')} documents, {status.get('chunks')} chunks)"
    return f"(serving {((status.get('served') or {}).get('adapter'))} + index {(status.get('served') or {}).get('index')})"


if __name__ == "__main__":
    sys.exit(main())
