"""submitit's local executor without its controller process: the launcher of ``hydra/launcher=local``
(``hydra_plugins/convnn_sweeper/local_launcher.py``) starts each job's process itself, so it is the
job's parent and sees how it ended (a signal, an exit code), and it sets the job's GPUs."""

from __future__ import annotations

import os
import shlex
import subprocess

from submitit.local.local import LocalExecutor, LocalJob


class QueueExecutor(LocalExecutor):
    """``submit`` starts ``python -m submitit.core._submit`` directly, as job ``job_id`` seeing
    ``cuda_visible_devices`` with ``threads`` torch threads where given (``OMP_NUM_THREADS``; all set
    by the caller before each ``submit``); the process is ``process``. Its output goes to the job's
    submitit logs, as under submitit's own executors."""

    job_id = ""
    cuda_visible_devices = ""
    threads: int | None = None
    process: subprocess.Popen | None = None

    def _submit_command(self, command: str) -> LocalJob:
        job: LocalJob = LocalJob(folder=self.folder, job_id=self.job_id, tasks=[0])
        env = {
            **os.environ,
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_JOB_ID": self.job_id,
            "SUBMITIT_LOCAL_NTASKS": "1",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_LOCALID": "0",
            "SUBMITIT_LOCAL_GLOBALID": "0",
            "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices,
            **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}),
        }
        job.paths.folder.mkdir(parents=True, exist_ok=True)
        with job.paths.stdout.open("a") as out, job.paths.stderr.open("a") as err:
            self.process = subprocess.Popen(shlex.split(command), env=env, stdout=out, stderr=err)
        return job
