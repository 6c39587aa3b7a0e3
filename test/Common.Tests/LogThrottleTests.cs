using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;

namespace NbdServer.Common.Tests;

public sealed class LogThrottleTests
{
    private sealed class ListLogger : ILogger
    {
        public List<string> Lines { get; } = [];

        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (Lines)
            {
                Lines.Add(formatter(state, exception));
            }
        }
    }

    // An interval far longer than the test: summaries happen only when the test calls Summarize().
    private static readonly TimeSpan Interval = TimeSpan.FromHours(1);

    [Test]
    public void A_storm_of_one_error_is_one_line_then_one_summary_with_the_count()
    {
        var logger = new ListLogger();
        using var throttle = new LogThrottle(logger, Interval);
        int formatted = 0;
        for (int i = 0; i < 100_000; i++)
        {
            throttle.Report(LogLevel.Error, "ENOSPC writing extent 12", () => { formatted++; return "No space left on device"; });
        }
        throttle.Summarize();
        Assert.That(logger.Lines, Is.EqualTo(new[]
        {
            "ENOSPC writing extent 12: No space left on device",
            "ENOSPC writing extent 12: repeated 99,999 times in the last 3600 s",
        }));
        Assert.That(formatted, Is.EqualTo(1), "details are formatted only for the line that is written");
        Assert.That(throttle.TotalReported, Is.EqualTo(100_000));
    }

    [Test]
    public void A_quiet_interval_writes_nothing_and_a_key_that_went_quiet_is_logged_in_full_again()
    {
        var logger = new ListLogger();
        using var throttle = new LogThrottle(logger, Interval);
        throttle.Report(LogLevel.Warning, "EIO on extent 3", () => "first");
        throttle.Summarize();
        throttle.Summarize();
        throttle.Summarize();
        throttle.Report(LogLevel.Warning, "EIO on extent 3", () => "again");
        Assert.That(logger.Lines, Is.EqualTo(new[] { "EIO on extent 3: first", "EIO on extent 3: again" }));
    }

    [Test]
    public void Distinct_keys_beyond_the_limit_share_one_overflow_bucket()
    {
        var logger = new ListLogger();
        using var throttle = new LogThrottle(logger, Interval, maxKeys: 4);
        for (int i = 0; i < 10_000; i++)
        {
            throttle.Report(LogLevel.Error, $"error {i}", () => "details");
        }
        throttle.Summarize();
        Assert.That(logger.Lines, Has.Count.LessThanOrEqualTo(7), string.Join('\n', logger.Lines));
        Assert.That(logger.Lines, Has.Some.Contains("repeated 9,995 times"));
    }

    [Test]
    public void The_timer_writes_the_summary_without_further_reports()
    {
        var logger = new ListLogger();
        using var throttle = new LogThrottle(logger, TimeSpan.FromMilliseconds(50));
        throttle.Report(LogLevel.Error, "k", () => "d");
        throttle.Report(LogLevel.Error, "k", () => "d");
        Assert.That(() => { lock (logger.Lines) { return logger.Lines.Count; } }, Is.EqualTo(2).After(5000, 20));
    }
}
