using Microsoft.Extensions.Logging;

namespace NbdServer.Common.Logging;

/// <summary>
/// Keeps a storm of identical errors readable: the first occurrence of a key is logged with its
/// details, later ones within the interval are only counted, and each interval that saw repeats
/// ends in one summary line ("…: repeated 12,345 times in the last 5 s").
/// </summary>
/// <remarks>
/// The incident this project answers logged 777,000 lines in 5 s for one full disk. Keys are
/// bounded (<see cref="MaxKeys"/>); past that, new keys share one overflow bucket so memory stays
/// flat even when every error message is distinct.
/// </remarks>
public sealed partial class LogThrottle : IDisposable
{
    public const int DefaultMaxKeys = 256;
    private const string OverflowKey = "(other repeated errors)";

    private readonly ILogger _logger;
    private readonly TimeProvider _time;
    private readonly Dictionary<string, Entry> _entries = new(StringComparer.Ordinal);
    private readonly ITimer _timer;
    private readonly Lock _lock = new();

    public LogThrottle(ILogger logger, TimeSpan interval, int maxKeys = DefaultMaxKeys, TimeProvider? time = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThanOrEqual(interval, TimeSpan.Zero);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxKeys, 1);
        _logger = logger;
        Interval = interval;
        MaxKeys = maxKeys;
        _time = time ?? TimeProvider.System;
        _timer = _time.CreateTimer(_ => Summarize(), null, interval, interval);
    }

    public TimeSpan Interval { get; }

    public int MaxKeys { get; }

    /// <summary>Total occurrences reported, logged or not (for tests and metrics).</summary>
    public long TotalReported { get; private set; }

    /// <summary>
    /// Reports one occurrence. <paramref name="key"/> identifies "the same error" (e.g. "ENOSPC writing
    /// extent 12"); <paramref name="details"/> is only formatted when the line is actually written.
    /// </summary>
    public void Report(LogLevel level, string key, Func<string> details, Exception? exception = null)
    {
        lock (_lock)
        {
            TotalReported++;
            if (_entries.TryGetValue(key, out Entry? entry) || (_entries.Count >= MaxKeys && _entries.TryGetValue(key = OverflowKey, out entry)))
            {
                entry.Suppressed++;
                entry.Level = level;
                return;
            }
            _entries[key] = new Entry(level);
        }
        if (key == OverflowKey)
        {
            // The overflow bucket's first line is itself: details of one arbitrary error would mislead.
            LogFirst(_logger, level, key, "more distinct errors than the throttle tracks; counting them together", exception);
        }
        else
        {
            LogFirst(_logger, level, key, details(), exception);
        }
    }

    /// <summary>Writes summaries for keys that repeated and forgets keys that went quiet.</summary>
    public void Summarize()
    {
        List<(string Key, LogLevel Level, long Count)>? summaries = null;
        lock (_lock)
        {
            foreach ((string key, Entry entry) in _entries)
            {
                if (entry.Suppressed > 0)
                {
                    (summaries ??= []).Add((key, entry.Level, entry.Suppressed));
                    entry.Suppressed = 0;
                    entry.QuietIntervals = 0;
                }
                else if (++entry.QuietIntervals >= 2)
                {
                    _entries.Remove(key);
                }
            }
        }
        if (summaries is null)
        {
            return;
        }
        foreach ((string key, LogLevel level, long count) in summaries)
        {
            LogRepeated(_logger, level, key, count, Interval.TotalSeconds);
        }
    }

    public void Dispose()
    {
        _timer.Dispose();
        Summarize();
    }

    [LoggerMessage(EventId = 9000, Message = "{Key}: {Details}")]
    private static partial void LogFirst(ILogger logger, LogLevel level, string key, string details, Exception? exception);

    [LoggerMessage(EventId = 9001, Message = "{Key}: repeated {Count:N0} times in the last {Seconds:0.#} s")]
    private static partial void LogRepeated(ILogger logger, LogLevel level, string key, long count, double seconds);

    private sealed class Entry(LogLevel level)
    {
        public LogLevel Level { get; set; } = level;

        public long Suppressed { get; set; }

        public int QuietIntervals { get; set; }
    }
}
