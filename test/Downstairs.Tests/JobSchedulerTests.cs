using NbdServer.Common.Logging;
using NbdServer.Downstairs.Server;

namespace NbdServer.Downstairs.Tests;

[CancelAfter(30_000)]
public sealed class JobSchedulerTests
{
    private sealed class TestJob(long first, long end, Action work) : IoJob
    {
        public override long FirstBlock => first;

        public override long EndBlock => end;

        public override JobAccess Access => JobAccess.Write;

        public override void Execute() => work();
    }

    [Test]
    public async Task A_job_that_throws_is_logged_and_the_io_thread_runs_the_next_jobs()
    {
        var log = new ListLogger();
        using var throttle = new LogThrottle(log, TimeSpan.FromSeconds(5));
        using var scheduler = new JobScheduler(1, throttle);
        var ran = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        scheduler.Submit(new TestJob(0, 1, () => throw new IndexOutOfRangeException("a bug")));
        // Same blocks: it depends on the failed job, so it only runs if that one was finished properly.
        scheduler.Submit(new TestJob(0, 1, ran.SetResult));
        await ran.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.That(log.Lines, Has.One.Contains("a bug"));
    }
}
