using System.CommandLine;
using System.CommandLine.Help;
using System.Text;

namespace NbdServer.Common.Cli;

/// <summary>
/// A command's <c>--help</c>, laid out like a man page: NAME, SYNOPSIS, DESCRIPTION, COMMANDS,
/// the option groups (option and placeholder in a 25-column field, the description wrapped beside
/// it), then the command's further sections.
/// </summary>
internal static class HelpText
{
    private const int Indent = 4;
    private const int Column = 25;
    private const int Width = 100;

    public static string Render(CliProgram program, Command command)
    {
        CommandDoc doc = program.DocOf(command);
        var text = new StringBuilder();
        Section(text, "NAME", $"{program.PathOf(command)} - {command.Description}");
        IReadOnlyList<string> synopsis = doc.Synopsis.Count > 0 ? doc.Synopsis : [DefaultSynopsis(program, command)];
        Section(text, "SYNOPSIS", string.Join('\n', synopsis));
        if (doc.Description.Length > 0)
        {
            Section(text, "DESCRIPTION", doc.Description);
        }
        List<Command> subcommands = [.. command.Subcommands.Where(c => !c.Hidden)];
        if (subcommands.Count > 0)
        {
            text.Append("COMMANDS\n");
            foreach (Command sub in subcommands)
            {
                Row(text, sub.Name, sub.Description ?? "");
            }
            text.Append('\n');
        }
        foreach ((string title, IReadOnlyList<Option> options) in Groups(command, doc))
        {
            text.Append(title).Append('\n');
            foreach (Option option in options)
            {
                Row(text, Label(option), option.Description ?? "");
            }
            text.Append('\n');
        }
        foreach ((string title, string body) in doc.Sections)
        {
            Section(text, title, body);
        }
        return text.ToString();
    }

    /// <summary>The option groups of a command, the last one (OPTIONS) ending with -h, --help.</summary>
    internal static List<(string Title, IReadOnlyList<Option> Options)> Groups(Command command, CommandDoc doc)
    {
        var grouped = new HashSet<Option>(doc.Groups.SelectMany(g => g.Options));
        List<Option> rest = [.. command.Options.Where(o => !o.Hidden && o is not HelpOption && !grouped.Contains(o))];
        rest.AddRange(AncestorHelp(command));
        var groups = new List<(string, IReadOnlyList<Option>)>(doc.Groups);
        int options = groups.FindIndex(g => g.Item1 == "OPTIONS");
        if (options >= 0)
        {
            groups[options] = ("OPTIONS", [.. groups[options].Item2, .. rest]);
        }
        else
        {
            groups.Add(("OPTIONS", rest));
        }
        return groups;
    }

    private static IEnumerable<Option> AncestorHelp(Command command)
    {
        for (Command? c = command; c is not null; c = c.Parents.OfType<Command>().FirstOrDefault())
        {
            if (c.Options.OfType<HelpOption>().FirstOrDefault() is { } help)
            {
                return [help];
            }
        }
        return [];
    }

    internal static string Label(Option option)
    {
        string names = string.Join(", ", option.Aliases.Where(a => a.Length == 2 && a[0] == '-' && char.IsAsciiLetter(a[1])).Order(StringComparer.Ordinal).Append(option.Name));
        return option.IsFlag() || option is HelpOption ? names : $"{names} {option.HelpName}";
    }

    internal static string DefaultSynopsis(CliProgram program, Command command)
    {
        var words = new StringBuilder(program.PathOf(command));
        if (command.Subcommands.Any(c => !c.Hidden))
        {
            words.Append(" COMMAND");
        }
        if (command.Options.Any(o => o is not HelpOption))
        {
            words.Append(" [OPTIONS]");
        }
        foreach (Argument argument in command.Arguments)
        {
            words.Append(' ').Append(argument.HelpName ?? argument.Name.ToUpperInvariant());
            if (argument.Arity.MaximumNumberOfValues > 1)
            {
                words.Append("...");
            }
        }
        return words.ToString();
    }

    private static void Section(StringBuilder text, string title, string body)
    {
        text.Append(title).Append('\n');
        foreach (string line in body.TrimEnd().Split('\n'))
        {
            text.Append(line.Length == 0 ? "" : new string(' ', Indent) + line.TrimEnd()).Append('\n');
        }
        text.Append('\n');
    }

    private static void Row(StringBuilder text, string label, string description)
    {
        int start = text.Length;
        text.Append(' ', Indent).Append(label);
        List<string> lines = Wrap(description, Width - Indent - Column);
        if (label.Length >= Column)
        {
            text.Append('\n');
        }
        else
        {
            text.Append(' ', Column - label.Length);
        }
        for (int i = 0; i < lines.Count; i++)
        {
            if (i > 0 || label.Length >= Column)
            {
                text.Append(' ', Indent + Column);
            }
            text.Append(lines[i]).Append('\n');
        }
        if (lines.Count == 0)
        {
            text.Length = text.ToString(start, text.Length - start).TrimEnd().Length + start;
            text.Append('\n');
        }
    }

    internal static List<string> Wrap(string text, int width)
    {
        var lines = new List<string>();
        var line = new StringBuilder();
        foreach (string word in text.Split([' ', '\n'], StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.Length > 0 && line.Length + 1 + word.Length > width)
            {
                lines.Add(line.ToString());
                line.Clear();
            }
            if (line.Length > 0)
            {
                line.Append(' ');
            }
            line.Append(word);
        }
        if (line.Length > 0)
        {
            lines.Add(line.ToString());
        }
        return lines;
    }
}
