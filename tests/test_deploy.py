"""
deploy/: the manifests validate offline against the Kubernetes schemas, the
example secrets have the original's shape, and the container's entrypoint,
given the environment and mounted files a pod would see, serves tokens (with
our manifest and with the original issuer's).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .consumer import consumerVerify
from .support import TEST_HMAC_KEY, Client, TestPKI, cleanEnviron, readUntil
from .test_operations import adminGet

try:
    import kubernetes_validate
    import yaml
except ImportError:  # pragma: no cover - the test extra installs them
    kubernetes_validate = None
    yaml = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
ORIGINAL = os.path.join(ROOT, "tests", "fixtures", "original-manifest.yml")
KUBERNETES_VERSION = "1.30"


def loadDocuments(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for document in documents:
        if document["kind"] == kind and (name is None or document["metadata"]["name"] == name):
            return document
    raise AssertionError(f"no {kind} {name or ''} in the manifest")


def containerEntrypoint() -> list[str]:
    with open(os.path.join(DEPLOY, "Containerfile"), encoding="utf-8") as handle:
        text = handle.read()
    [line] = [line for line in text.splitlines() if line.startswith("ENTRYPOINT ")]
    return json.loads(line[len("ENTRYPOINT ") :])


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pod:
    """
    What the kubelet gives the container: environment from envFrom (ConfigMaps
    and Secrets) and volumes (Secrets and ConfigMaps as files), with each
    mountPath mapped to a temporary folder and paths in the environment mapped
    the same way; only the ports are moved to free loopback ports.
    """

    def __init__(self, documents: list[dict[str, Any]], secrets: list[dict[str, Any]], folder: str) -> None:
        self.documents = documents + secrets
        deployment = find(documents, "Deployment")
        self.podSpec = deployment["spec"]["template"]["spec"]
        self.container = self.podSpec["containers"][0]
        self.mounts: dict[str, str] = {}
        volumes = {volume["name"]: volume for volume in self.podSpec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            local = os.path.join(folder, mount["name"])
            os.makedirs(local)
            volume = volumes[mount["name"]]
            if "secret" in volume:
                files = self._secretData(volume["secret"]["secretName"])
                mode = volume["secret"].get("defaultMode", 0o644)
            else:
                files = {
                    k: v.encode()
                    for k, v in find(self.documents, "ConfigMap", volume["configMap"]["name"])["data"].items()
                }
                mode = volume["configMap"].get("defaultMode", 0o644)
            for name, data in files.items():
                path = os.path.join(local, name)
                with open(path, "wb") as handle:
                    handle.write(data)
                os.chmod(path, mode)
            self.mounts[mount["mountPath"]] = local
        self.environ: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            if "configMapRef" in source:
                data = find(self.documents, "ConfigMap", source["configMapRef"]["name"])["data"]
                self.environ.update({k: str(v) for k, v in data.items()})
            else:
                data = self._secretData(source["secretRef"]["name"])
                self.environ.update({k: v.decode("utf-8") for k, v in data.items()})
        for key, value in self.environ.items():
            for mountPath, local in self.mounts.items():
                if value.startswith(mountPath + "/"):
                    self.environ[key] = local + value[len(mountPath) :]
        self.port = freePort()
        self.adminPort = freePort()
        self.environ["TOK_ISS_LISTEN"] = f"tcp:{self.port}:interface=127.0.0.1"
        self.environ["TOK_ISS_ADMIN_LISTEN"] = f"tcp:{self.adminPort}:interface=127.0.0.1"

    def _secretData(self, name: str) -> dict[str, bytes]:
        secret = find(self.documents, "Secret", name)
        return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def secretsFor(pki: TestPKI) -> list[dict[str, Any]]:
    """The example secrets' shape with real values, as `kubectl create secret` would make them."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "token-secret"},
            "data": {"TOK_ISS_HMAC_SECRET": b64(TEST_HMAC_KEY.encode())},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "token-tls"},
            "data": {"tls.crt": b64(pki.server.certificatePEM()), "tls.key": b64(pki.server.keyPEM())},
        },
    ]


class ManifestTests(SynchronousTestCase):
    def setUp(self) -> None:
        if kubernetes_validate is None:
            self.skipTest("kubernetes-validate is not installed (pip install '.[test]')")

    def test_everyManifestValidates(self) -> None:
        for path in (os.path.join(DEPLOY, "tokenissuer.yml"), os.path.join(DEPLOY, "secrets.example.yml"), ORIGINAL):
            for document in loadDocuments(path):
                with self.subTest(path=os.path.basename(path), kind=document["kind"]):
                    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)

    def test_objectsAsRequired(self) -> None:
        documents = loadDocuments(os.path.join(DEPLOY, "tokenissuer.yml"))
        kinds = sorted(document["kind"] for document in documents)
        self.assertEqual(
            kinds,
            [
                "ConfigMap",
                "ConfigMap",
                "Deployment",
                "HorizontalPodAutoscaler",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "Service",
            ],
        )
        deployment = find(documents, "Deployment")
        self.assertEqual(deployment["spec"]["replicas"], 2)
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        context = container["securityContext"]
        self.assertTrue(context["readOnlyRootFilesystem"])
        self.assertFalse(context["allowPrivilegeEscalation"])
        self.assertEqual(context["capabilities"]["drop"], ["ALL"])
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
        [tls] = [volume for volume in pod["volumes"] if volume.get("secret", {}).get("secretName") == "token-tls"]
        self.assertEqual(tls["secret"]["defaultMode"], 0o400)
        self.assertIn("readinessProbe", container)
        self.assertIn("livenessProbe", container)
        self.assertIn("limits", container["resources"])
        config = find(documents, "ConfigMap", "issuer-config")["data"]
        drain = int(config["TOK_ISS_DRAIN_SECONDS"])
        preStop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        self.assertGreaterEqual(pod["terminationGracePeriodSeconds"], drain + preStop)
        service = find(documents, "Service")
        self.assertEqual(service["spec"]["type"], "LoadBalancer")
        self.assertEqual([p["port"] for p in service["spec"]["ports"]], [4443])
        policy = find(documents, "NetworkPolicy")["spec"]["ingress"]
        tlsRule = [rule for rule in policy if rule["ports"][0]["port"] == 4443][0]
        adminRule = [rule for rule in policy if rule["ports"][0]["port"] == 9090][0]
        self.assertNotIn("from", tlsRule)
        self.assertEqual(adminRule["from"], [{"namespaceSelector": {}}])

    def test_exampleSecretsHaveTheSeedShape(self) -> None:
        documents = loadDocuments(os.path.join(DEPLOY, "secrets.example.yml"))
        self.assertEqual(
            [(d["kind"], d["metadata"]["name"]) for d in documents],
            [("Secret", "token-secret"), ("Secret", "token-tls")],
        )
        self.assertEqual(list(documents[0]["data"]), ["TOK_ISS_HMAC_SECRET"])
        self.assertEqual(sorted(documents[1]["data"]), ["tls.crt", "tls.key"])
        for document in documents:
            for value in document["data"].values():
                self.assertTrue(set(value.replace("\n", "")) <= {"A"}, "placeholders only")

    def test_containerfile(self) -> None:
        self.assertEqual(containerEntrypoint(), ["twistd", "--nodaemon", "--pidfile=", "tokenissuer"])
        with open(os.path.join(DEPLOY, "Containerfile"), encoding="utf-8") as handle:
            text = handle.read()
        self.assertRegex(text, r"(?m)^USER 10001")
        self.assertRegex(text, r"(?m)^EXPOSE 4443 9090$")
        self.assertRegex(text, r"(?m)^FROM python:3\.11-slim$")


class EntrypointTests(TestCase):
    """The image's entrypoint, run exactly, in the environment a pod of each manifest gets."""

    timeout = 120

    def setUp(self) -> None:
        if yaml is None:
            self.skipTest("PyYAML is not installed (pip install '.[test]')")
        self.pki = TestPKI(os.path.abspath(self.mktemp()))

    async def runPod(self, manifest: str, expectAdmin: bool) -> None:
        documents = loadDocuments(manifest)
        find(documents, "ConfigMap", "root-config")["data"]["root.pem"] = self.pki.ca.certificatePEM().decode()
        pod = Pod(documents, secretsFor(self.pki), os.path.abspath(self.mktemp()))
        entrypoint = containerEntrypoint()
        executable = os.path.join(os.path.dirname(sys.executable), entrypoint[0])
        environ = cleanEnviron(**pod.environ)
        environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", "")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        process = subprocess.Popen(
            [executable, *entrypoint[1:]],
            env=environ,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        output = await deferToThread(readUntil, process, "tokenissuer ready", 60)
        self.assertIn("tokenissuer ready", output, shlex.join(entrypoint) + "\n" + output)
        self.assertNotIn(TEST_HMAC_KEY, output)
        certFile, keyFile = self.pki.clientFiles(self.pki.client, "client")
        client = Client(pod.port, self.pki.path("ca.pem"), certFile, keyFile)
        response = await deferToThread(client.call)
        self.assertEqual(response.status, 200, response.body)
        consumerVerify(response.json()["token"], TEST_HMAC_KEY.encode(), "gschmarri", "daheim_token_issuer")
        if expectAdmin:
            probe = pod.container["readinessProbe"]["httpGet"]["path"]
            status, _ = await deferToThread(adminGet, pod.adminPort, probe)
            self.assertEqual(status, 200)
            status, _ = await deferToThread(adminGet, pod.adminPort, pod.container["livenessProbe"]["httpGet"]["path"])
            self.assertEqual(status, 200)
        process.send_signal(signal.SIGTERM)
        grace = pod.podSpec.get("terminationGracePeriodSeconds", 30)
        returnCode = await deferToThread(process.wait, grace)
        rest = process.stdout.read() if process.stdout else ""
        self.assertEqual(returnCode, 0, rest)

    async def test_ourManifest(self) -> None:
        await self.runPod(os.path.join(DEPLOY, "tokenissuer.yml"), expectAdmin=True)

    async def test_originalManifestRunsUnchanged(self) -> None:
        await self.runPod(ORIGINAL, expectAdmin=False)

    async def test_secretFilesReadableOnlyByOwner(self) -> None:
        """defaultMode 0400 as the manifest asks: the entrypoint still reads them (as their owner)."""
        documents = loadDocuments(os.path.join(DEPLOY, "tokenissuer.yml"))
        find(documents, "ConfigMap", "root-config")["data"]["root.pem"] = self.pki.ca.certificatePEM().decode()
        pod = Pod(documents, secretsFor(self.pki), os.path.abspath(self.mktemp()))
        mode = os.stat(os.path.join(pod.mounts["/opt/tls"], "tls.key")).st_mode & 0o777
        self.assertEqual(mode, 0o400)
        self.assertTrue(re.match(r"^tcp:\d+:interface=127\.0\.0\.1$", pod.environ["TOK_ISS_LISTEN"]))
